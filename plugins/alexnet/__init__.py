"""AlexNet-specific tools: torchvision weight conversion (``torchvision_weights``) and the
paper's ablations as pairs of recipes (``ablate``). Nothing here is registered: the network
itself is the ``alexnet-*`` recipes, built from the generic layer plugins."""
