"""AlexNet-specific tools: torchvision weight conversion (issue: paper-faithful AlexNet)."""
