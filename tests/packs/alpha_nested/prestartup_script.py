# runs before any pack is imported (as ComfyUI's main.py does); folder_paths already resolves here
import os

import folder_paths

os.environ["KILN_TEST_PRESTARTUP"] = folder_paths.get_output_directory()
