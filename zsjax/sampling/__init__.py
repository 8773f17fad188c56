"""One sampler for everything: the policy rollout, the simulator and the CLI."""

from zsjax.sampling.distribution import SamplingParams, filter_logits
from zsjax.sampling.sampler import (DecodeSession, GenerateResult, bucket, continue_generate,
                                    generate)

__all__ = ["DecodeSession", "GenerateResult", "continue_generate", "SamplingParams", "bucket", "filter_logits", "generate"]
