"""zsjax: ZeroSearch in JAX. Reinforcement learning that teaches a language model to search,
with an LLM simulator standing in for the search engine."""

__version__ = "0.1.0"
