"""A deterministic stand-in for a rollout ENGINE (not for the eval math): it implements the RolloutEngine protocol
by answering from a function of (prompt text, sample index), and records the sampling params it was given."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_lpreg.rollout.base import Completion, EngineHealth, SamplingParams, WeightUpdate


class TableEngine:
    def __init__(self, tokenizer: Any, respond: Callable[[str, int], str]) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.calls: list[tuple[int, SamplingParams]] = []
        self.closed = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.calls.append((len(prompts), params))
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            for j in range(params.n):
                response = self.tokenizer.encode(self.respond(text, j), add_special_tokens=False)
                finish = "length" if len(response) >= params.max_new_tokens else "stop"
                if finish == "length":
                    response = response[:params.max_new_tokens]
                else:
                    response = response + [self.tokenizer.eos_token_id]
                out.append(Completion(prompt_index=i, sample_index=j, prompt_ids=list(ids), response_ids=response,
                                      logprobs=[0.0] * len(response), finish_reason=finish))
        return out

    def update_weights(self, update: WeightUpdate) -> None:
        raise NotImplementedError

    def health(self) -> EngineHealth:
        return EngineHealth(ok=True)

    def shutdown(self) -> None:
        self.closed = True


def table(answers: dict[str, list[str]]) -> Callable[[str, int], str]:
    """respond() that finds the key contained in the prompt and cycles through its responses."""
    def respond(prompt_text: str, sample: int) -> str:
        keys = [k for k in answers if k in prompt_text]
        assert len(keys) == 1, f"prompt matches {keys}: {prompt_text!r}"
        options = answers[keys[0]]
        return options[sample % len(options)]
    return respond
