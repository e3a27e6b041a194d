"""mmgraph: compile and train LLaVA-family multimodal models for dataflow hardware."""

__version__ = "0.1.0"
