"""Sampling's arithmetic against hand computations (OpenAI's and vLLM's definitions): the bias, the repetition
penalty over the prompt's and the generated tokens, the presence and frequency penalties over the generated ones,
min-p; the checks of its values; Engine.generate's sampling keywords and stop strings."""

from __future__ import annotations

import pytest
import torch

from offload_moe.demo import resolve_model
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.generate import Adjust, StopText, sample
from offload_moe.options import EngineOptions
from offload_moe.sampling import Sampling

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])


def adjusted(s: Sampling, prompt: list[int], generated: list[int]) -> torch.Tensor:
    adjust = Adjust(s, prompt)
    adjust(LOGITS)  # the first call sizes the counts
    for t in generated:
        adjust.update(torch.tensor(t))
    return adjust(LOGITS)


def test_penalties_and_bias_by_hand():
    """Prompt [0, 1], generated [3, 3, 2]. Repetition 2: the seen tokens 0-3, positive logits halved, negative
    doubled (token 4, unseen, untouched). Frequency 0.5 and presence 0.25: token 3 (twice) loses 1.25, token 2
    (once) 0.75, the prompt's tokens nothing. The bias adds first, so a repetition penalty sees the biased logit."""
    seen = adjusted(Sampling(repetition_penalty=2.0), [0, 1], [3, 3, 2])
    assert seen.tolist() == [1.0, -2.0, 0.25, 1.5, -2.0, 1.0]
    counted = adjusted(Sampling(frequency_penalty=0.5, presence_penalty=0.25), [0, 1], [3, 3, 2])
    assert counted.tolist() == [2.0, -1.0, -0.25, 1.75, -2.0, 1.0]
    biased = adjusted(Sampling(logit_bias={4: 5.0, 1: 3.0}, repetition_penalty=2.0), [0, 1], [])
    assert biased.tolist() == [1.0, 1.0, 0.5, 3.0, 3.0, 1.0]  # token 1: -1 + 3 = 2, halved
    assert not Sampling().adjusts and Sampling(presence_penalty=0.1).adjusts


def test_min_p_drops_tokens_under_its_share_of_the_top_one():
    """Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 keeps those over 0.1 (0.2 x 0.5); token 3 is never drawn."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    s = Sampling(temperature=1.0, min_p=0.2)
    drawn = {int(sample(logits, s, torch.Generator().manual_seed(i))) for i in range(300)}
    assert drawn == {0, 1, 2}
    everything = {int(sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(i))) for i in range(300)}
    assert 3 in everything


@pytest.mark.parametrize("fields,says", [({"temperature": "0.7"}, "--temperature must be a number"),
                                         ({"min_p": 1.5}, "--min-p"), ({"repetition_penalty": 0}, "--repetition"),
                                         ({"frequency_penalty": 3}, "--frequency-penalty"),
                                         ({"top_k": 2.5}, "--top-k"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                                         ({"logit_bias": {5: 200}}, "logit_bias")])
def test_bad_values_are_user_errors(fields, says):
    with pytest.raises(UserError, match=says):
        Sampling(**fields).check()


def test_stop_text_holds_back_what_could_begin_a_stop_string():
    shown = StopText(["END", "\n\n"])
    assert shown.push("abc E") == "abc " and shown.push("N") == "" and shown.push("x\n") == "ENx"
    assert shown.push("\nmore") == "" and shown.stopped and shown.text == "abc ENx"
    tail = StopText(["END"])
    assert tail.push("a EN") == "a " and tail.push("", final=True) == "EN"


@pytest.fixture(scope="module")
def demo():
    return Engine.load(resolve_model("demo"), EngineOptions(cache_experts=2, progress=False))


def test_generate_takes_sampling_keywords_and_stop(demo):
    prompt = "def fib(n):"
    a = demo.generate(prompt, 12, temperature=0.8, top_k=40, min_p=0.05, seed=3)
    assert a.tokens == demo.generate(prompt, 12, Sampling(temperature=0.8, top_k=40, min_p=0.05, seed=3)).tokens
    assert a.tokens == demo.generate(prompt, 12, Sampling(temperature=0.3), temperature=0.8, top_k=40, min_p=0.05,
                                     seed=3).tokens  # keywords over the Sampling's fields
    assert demo.generate(prompt, 12, repetition_penalty=1.5).tokens != demo.generate(prompt, 12).tokens
    full = demo.generate(prompt, 24).text
    stop = full[5:8]
    cut = demo.generate(prompt, 24, stop=["@@", stop])
    assert cut.text == full[: full.find(stop)] and cut.stop_reason == "stop"
    assert "".join(demo.stream(prompt, 24, stop=stop)) == cut.text
    with pytest.raises(TypeError, match="generate\\(\\) got an unexpected keyword argument 'temp'"):
        demo.generate(prompt, 4, temp=0.5)
    with pytest.raises(TypeError, match="stream\\(\\) got an unexpected keyword argument 'top_n'"):
        demo.stream(prompt, 4, top_n=5)
    for kw, says in (({"temperature": "hot"}, "--temperature"), ({"stop": 5}, "stop must be"),
                     ({"max_new_tokens": "8"}, "--max-new-tokens")):
        with pytest.raises(UserError, match=says):
            demo.generate(prompt, **{"max_new_tokens": 4} | kw)
