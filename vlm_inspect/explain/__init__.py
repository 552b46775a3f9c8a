"""Where the model looks: TGA-ZSR text-guided attention, Grad-CAM (captum), overlays."""
from .attention import attention_from_tokens, attention_shift, text_guided_attention
from .gradcam import grad_cam
from .overlay import overlay

__all__ = ["attention_from_tokens", "attention_shift", "grad_cam", "overlay", "text_guided_attention"]
