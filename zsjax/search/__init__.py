"""The search agent: prompts, action parsing, search backends and the multi-turn rollout."""

from zsjax.search.actions import Action, parse_action
from zsjax.search.backend import FunctionBackend, SearchBackend, SearchRequest
from zsjax.search.rollout import (RolloutSettings, Trajectory, model_generate_fn, prompt_ids,
                                  rollout)

__all__ = ["Action", "FunctionBackend", "RolloutSettings", "SearchBackend", "SearchRequest",
           "Trajectory", "model_generate_fn", "parse_action", "prompt_ids", "rollout"]
