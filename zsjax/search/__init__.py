"""The search agent: prompts, action parsing, search backends and the multi-turn rollout."""

from zsjax.search.actions import Action, parse_action
from zsjax.search.backend import (FunctionBackend, SearchBackend, SearchRequest, StepCache,
                                  noisy_fraction)
from zsjax.search.rollout import (ModelTurnGenerator, RolloutSettings, Trajectory, TurnGenerator,
                                  TurnInputs, prompt_ids, rollout)

__all__ = ["Action", "FunctionBackend", "StepCache", "noisy_fraction", "RolloutSettings", "SearchBackend", "SearchRequest",
           "ModelTurnGenerator", "Trajectory", "TurnGenerator", "TurnInputs", "parse_action",
           "prompt_ids", "rollout"]
