"""Launch the vlm_inspect page: ``python app.py [--suite embedded|pretrained] [--host 127.0.0.1] [--port 7860]``."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from vlm_inspect.ui.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
