"""quickstart_pytorch: Flower's PyTorch quickstart on the digits, plus fedsqueeze."""
