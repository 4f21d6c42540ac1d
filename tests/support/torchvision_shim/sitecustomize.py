"""Test support for the Pixtral demo on vLLM's CPU build (tests/contract/test_images.py).

vllm/model_executor/models/pixtral.py (line 19) imports
`transformers.models.pixtral.image_processing_pixtral._num_image_tokens`, and in
transformers 5.19 that module imports torchvision at its top (line 19). The CPU venv has no
torchvision (PyPI's build is for CUDA torch and fails on `torchvision::nms` with the CPU
torch), so importing vLLM's Pixtral model fails.

Only when torchvision cannot be found, this finder serves that one module as a stub that
holds the pure-Python helpers vLLM uses. The Mistral-format Pixtral path preprocesses images
with mistral_common, never with the HF image processor. Put this folder on PYTHONPATH so
every process vLLM spawns (registry inspection, engine core) picks it up at start-up.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

_TARGET = "transformers.models.pixtral.image_processing_pixtral"


def _num_image_tokens(image_size, patch_size):
    # Same as transformers' helper (returns (num_height_tokens, num_width_tokens)).
    height, width = image_size
    ph, pw = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    return (height - 1) // ph + 1, (width - 1) // pw + 1


def get_resize_output_image_size(input_image, size, patch_size):
    raise NotImplementedError("HF Pixtral image processor needs torchvision")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module._num_image_tokens = _num_image_tokens
        module.get_resize_output_image_size = get_resize_output_image_size


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        try:
            if importlib.util.find_spec("torchvision") is not None:
                return None  # a real torchvision: let the real module load
        except (ImportError, ValueError):
            pass
        return importlib.machinery.ModuleSpec(fullname, _Loader())


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
