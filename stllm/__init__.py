"""stllm: LLM-based spatiotemporal forecasting."""
__version__ = "0.1.0"
