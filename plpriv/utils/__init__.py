"""Small helpers shared by modules and callbacks (they import nothing else from plpriv)."""

from plpriv.utils.figures import figure, run_dir, save_and_log_figure, save_and_log_images

__all__ = ["figure", "run_dir", "save_and_log_figure", "save_and_log_images"]
