"""fedsqueeze: federated learning on edge devices with compressed, secure and private updates."""

__version__ = "0.1.0"
