import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # tests/hf_reference.py
sys.path.insert(0, os.path.dirname(HERE))  # the project root, also when not pip-installed
