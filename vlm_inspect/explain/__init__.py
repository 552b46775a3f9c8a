"""Where the model looks: TGA-ZSR text-guided attention, Grad-CAM (captum), overlays, and the
:data:`HEATMAPS` registry that offers them to the page, the command lines and the service."""
from .attention import attention_from_tokens, attention_shift, text_guided_attention
from .gradcam import grad_cam
from .heatmaps import HEATMAPS, heatmap_help
from .overlay import overlay

__all__ = ["HEATMAPS", "attention_from_tokens", "attention_shift", "grad_cam", "heatmap_help", "overlay",
           "text_guided_attention"]
