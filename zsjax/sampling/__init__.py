"""One sampler for everything: the policy rollout, the simulator and the CLI."""

from zsjax.sampling.distribution import SamplingParams, filter_logits
from zsjax.sampling.sampler import GenerateResult, bucket, generate

__all__ = ["GenerateResult", "SamplingParams", "bucket", "filter_logits", "generate"]
