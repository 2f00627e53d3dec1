"""Explanations of single predictions (Grad-CAM heat maps) for clinicians and the serving API."""

from pneumonet.explain.gradcam import gradcam, image_png, overlay_png

__all__ = ["gradcam", "image_png", "overlay_png"]
