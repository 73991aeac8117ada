import os
import sys

# Test workers are spawned and import test modules by name.
sys.path.insert(0, os.path.dirname(__file__))
