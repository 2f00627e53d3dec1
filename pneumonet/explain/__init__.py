"""Explanations of single predictions (Grad-CAM heat maps) for clinicians and the serving API."""

from pneumonet.explain.gradcam import gradcam, overlay_png

__all__ = ["gradcam", "overlay_png"]
