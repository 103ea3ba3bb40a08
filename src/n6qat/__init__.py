"""n6qat: quantization-aware fine-tuning of audio classifiers for the STM32N6 NPU."""

from n6qat.errors import N6QATError

__all__ = ["N6QATError", "__version__"]
__version__ = "0.1.0"
