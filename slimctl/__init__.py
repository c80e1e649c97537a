"""slimctl: slim Hugging Face models and prove the result by measurement."""
__version__ = "0.1.0"
