"""Weight conversion between this library's models and torchvision / torch.nn layouts."""

from residual.interop.torchvision import load_torchvision, to_torchvision_state_dict

__all__ = ["load_torchvision", "to_torchvision_state_dict"]
