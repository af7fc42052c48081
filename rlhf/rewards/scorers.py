"""Scoring responses: one interface, ``reward(prompts, responses) -> scores (B,)``.

Three kinds (config group ``reward``): a Python function chosen by Hydra ``_target_``, a frozen
Hugging Face sequence classifier that reads the decoded (prompt, response) with its own tokenizer,
or an HTTP endpoint. ``RewardNormalizer`` optionally rescales and clips training rewards.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import hydra
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config.redact import mask_url, mask_url_in
from rlhf.models.loading import DTYPES, disable_dropout, loading


class FunctionReward:
    """Wraps ``fn(prompts, responses) -> list of floats``."""

    def __init__(self, fn: Callable[[list[str], list[str]], list[float]]):
        self.fn = fn

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32)


class ClassifierReward:
    """A frozen sequence classifier scoring each (prompt, response); score = logit 0.

    ``input_format``: ``pair`` tokenizes (prompt, response) as a text pair, as reward models trained on
    question/answer pairs expect (OpenAssistant's DeBERTa ones); ``chat`` renders a user turn and an
    assistant turn with the reward tokenizer's chat template, as chat reward models (Skywork-Reward,
    ArmoRM) expect. Inputs are right-padded: DeBERTa-style reward models pool the first token, and
    left padding shifts their scores.
    """

    def __init__(
        self,
        path: str,
        *,
        max_length: int,
        batch_size: int,
        device: torch.device,
        dtype: str = "float32",
        input_format: str = "pair",
    ) -> None:
        with loading("reward.path", path):
            self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
        # Checked before the model loads (a tokenizer is cheap, a reward model is not).
        if input_format == "chat" and not self.tokenizer.chat_template:
            raise ValueError(
                f"reward.input_format=chat needs a reward-model tokenizer with a chat template; the one at "
                f"reward.path={path!r} has none: use reward.input_format=pair"
            )
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"reward.path={path!r}: its tokenizer has no pad or EOS token to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with loading("reward.path", path):
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        if self.model.config.pad_token_id is None:
            # Qwen2/Llama classifiers score the last non-pad token and refuse a padded batch without a pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        disable_dropout(self.model)
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.input_format = input_format

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """The reward model's right-padded input for a batch, in ``input_format``."""
        return encode_for_reward(
            self.tokenizer, prompts, responses, input_format=self.input_format, max_length=self.max_length
        )

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            batch = self.encode(prompts[start:end], responses[start:end]).to(self.model.device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)


def encode_for_reward(
    tokenizer, prompts: list[str], responses: list[str], *, input_format: str, max_length: int
) -> dict[str, torch.Tensor]:
    """A sequence classifier's input for (prompt, response) pairs in ``input_format`` (``pair``: a text
    pair; ``chat``: a user and an assistant turn through the tokenizer's chat template), padded on the
    tokenizer's side. Reward-model training (rlhf.app.reward_model) encodes with it too, so a trained
    model is scored on the inputs it was trained on."""
    settings = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
    if input_format == "pair":
        return tokenizer(prompts, responses, **settings)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    # The template already holds the special tokens (BOS, turn markers): adding them again would double them.
    return tokenizer(texts, add_special_tokens=False, **settings)


class HTTPReward:
    """POST ``{"prompts": [...], "responses": [...]}`` as JSON to ``url``; the answer must be
    ``{"scores": [...]}`` with one number per response, and ``headers`` go with every request (an
    ``Authorization`` token). Failed requests are retried."""

    def __init__(
        self, url: str, *, timeout: float, retries: int, batch_size: int, headers: dict[str, str] | None = None
    ) -> None:
        self.url, self.timeout, self.retries, self.batch_size = url, timeout, retries, batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch = {"prompts": prompts[rows], "responses": responses[rows]}
            scores += self.post(batch, offset=start)
        return torch.tensor(scores, dtype=torch.float32)

    def post(self, batch: dict[str, list[str]], offset: int = 0) -> list[float]:
        """The scores of one request; ``offset`` is the index of its first response in the call."""
        shown = mask_url(self.url)  # a token in the query string or user info stays out of errors and logs
        request = urllib.request.Request(
            self.url, data=json.dumps(batch).encode(), headers=self.headers, method="POST"
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    scores = json.loads(answer.read())["scores"]
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    detail = mask_url_in(str(error), self.url)
                    raise RuntimeError(
                        f"reward.url={shown!r} failed {self.retries + 1} time(s); last error: {detail}"
                    ) from error
                time.sleep(min(0.1 * 2**attempt, 2.0))
            except (KeyError, ValueError) as error:
                raise RuntimeError(
                    f'reward.url={shown!r} did not answer {{"scores": [...]}}: {mask_url_in(str(error), self.url)}'
                ) from error
        if len(scores) != len(batch["prompts"]):
            raise RuntimeError(
                f"reward.url={shown!r} returned {len(scores)} scores for {len(batch['prompts'])} responses"
            )
        for index, score in enumerate(scores):
            # null, a string or a list would stop the run later with a bare TypeError naming nothing.
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise RuntimeError(
                    f"reward.url={shown!r} answered a score that is not a number for response {offset + index}: "
                    f'{score!r} (expected {{"scores": [number, ...]}}, one per response)'
                )
        return [float(score) for score in scores]


def build_reward(
    reward, device: torch.device, *, path: str | None = None
) -> FunctionReward | ClassifierReward | HTTPReward:
    """The reward of a run from the ``reward`` config group; ``path``: the folder of a reward model built
    for the run (kind=proxy)."""
    if reward.kind == "function":
        return FunctionReward(hydra.utils.instantiate(reward.fn))
    if reward.kind in ("model", "proxy"):
        return ClassifierReward(
            path or reward.path,
            max_length=reward.max_length,
            batch_size=reward.batch_size,
            device=device,
            dtype=reward.dtype,
            input_format=reward.input_format,
        )
    if reward.kind == "http":
        return HTTPReward(
            reward.url,
            timeout=reward.timeout,
            retries=reward.retries,
            batch_size=reward.batch_size,
            headers=dict(reward.headers),
        )
    raise ValueError(f"reward.kind={reward.kind!r}: expected 'function', 'model', 'proxy' or 'http'")
