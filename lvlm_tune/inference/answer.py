"""Answer questions with a trained model, rendering prompts with the training renderer.

The prompt is the training rendering cut where the answer starts (``ConversationEncoder``
with ``prompt=True``), so the model sees at inference exactly the prefix it learned on: each
image expands to the tokens training gave it (a fixed count, or for the anyres families the
count for that image's size, read from its header). Generation is greedy by default, batched
with left padding (rows may hold different numbers of images, or none), and stops at the
template's STOP (the EOS token, or a STOP string such as ``###``, which is cut from the answer).
The image inputs of a batch are the training collator's: ``pixel_values`` in image order
(anyres tiles padded), and the processors' ``image_sizes`` / ``batch_num_images``. Each image is
opened once per answer: the sizes the prompt expands with and the pixels come from one decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from lvlm_tune.data.collator import batch_extras, concat_pixels
from lvlm_tune.data.encoder import ConversationEncoder
from lvlm_tune.data.images import ImageLoader
from lvlm_tune.data.record import Conversation
from lvlm_tune.data.video import VideoLoader


class Answerer:
    """Batched question answering for a model + processor + the training template.

    Args:
        model: a model of the family (plain or PEFT-wrapped) in eval mode.
        processor: its processor (tokenizer + image processor).
        encoder: the conversation encoder with the training template and image settings.
        images: the image loader (processor, folder, aspect ratio) used in training.
        needs_pixels: the model's ``generate`` always runs the vision path (MiniGPT-4).
        videos: the video loader of a model that takes videos (OneVision), else ``None``.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        encoder: ConversationEncoder,
        images: ImageLoader,
        needs_pixels: bool = False,
        videos: VideoLoader | None = None,
    ) -> None:
        self.model = model
        self.videos = videos
        self.needs_pixels = needs_pixels
        self.processor = processor
        self.encoder = encoder
        self.images = images
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop = encoder.stop.strip()  # the template's STOP (e.g. Phi-3's <|end|>, ###)

    def stop_kwargs(self) -> dict[str, Any]:
        """``generate`` arguments that end an answer at the template's STOP."""
        tokenizer = self.processor.tokenizer
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stop_id = self.encoder.exact.control.get(self.stop)
        if stop_id is not None and stop_id not in eos:
            eos.append(stop_id)  # a control-token STOP other than EOS (<|end|>, <|eot_id|>)
        kwargs: dict[str, Any] = {"eos_token_id": eos or None, "pad_token_id": self.pad_id}
        if self.stop and stop_id is None:
            kwargs.update(stop_strings=[self.stop], tokenizer=tokenizer)
        return kwargs

    def clean(self, text: str) -> str:
        """Cut the generated text at the STOP and strip the separator."""
        if self.stop and self.stop in text:
            text = text[: text.index(self.stop)]
        return text.strip()

    def prompt_ids(self, record: Conversation, index: int = 0) -> torch.Tensor:
        """The generation prompt's ids of ``record``, image runs expanded as in training."""
        sizes = self.images.sizes(record) if self.encoder.num_image_tokens is None else None
        return torch.as_tensor(self.encoder.encode_prompt(record, index, image_sizes=sizes))

    def opened(self, record: Conversation) -> Conversation:
        """``record`` with its images decoded (each file opened once), when pixels are made:
        the prompt's image sizes and the pixels then come from the same decode. The decoded
        image has the file's size, so the ids and pixels are those of the paths."""
        if not record.images or self.images.processor is None:
            return record  # no pixels: the prompt reads only the headers
        images = [self.images.open(ref, record, k) for k, ref in enumerate(record.images)]
        return replace(record, images=images)

    def model_inputs(self, records: Sequence[Conversation]) -> tuple[dict[str, Any], int]:
        """``generate`` inputs for the records' prompts (left-padded) and the padded length.

        Families whose ``generate`` always runs the vision path get a blank image when no
        record has one (no image token in the text, so it fills nothing).
        """
        records = [self.opened(r) for r in records]
        prompts = [self.prompt_ids(r, i) for i, r in enumerate(records)]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: generation continues every row
            input_ids[row, length - len(ids) :] = ids
            attention_mask[row, length - len(ids) :] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        per_record = [self.images.model_inputs(r) for r in records]
        per_record = [item for item in per_record if item.get("pixel_values") is not None]
        pixels = [item.pop("pixel_values") for item in per_record]
        if not pixels and self.needs_pixels:
            pixels = [self.images.blank()]
        param = next(self.model.parameters())
        if pixels:
            inputs["pixel_values"] = concat_pixels(pixels).to(param.dtype)
        inputs.update(batch_extras(per_record))  # anyres: image_sizes, batch_num_images
        if self.videos is not None:  # OneVision: pixel_values_videos of the records' videos
            videos = batch_extras([self.videos.model_inputs(r) for r in records])
            inputs.update({k: v.to(param.dtype) for k, v in videos.items()})
        return {k: v.to(param.device) for k, v in inputs.items()}, length

    @torch.no_grad()
    def answer(
        self,
        records: Sequence[Conversation],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
    ) -> list[str]:
        """Answer each record's last user turn (records hold the conversation so far)."""
        inputs, length = self.model_inputs(records)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, **sampling_kwargs(temperature),
            **self.stop_kwargs(),
        )  # fmt: skip
        new = out[:, length:]
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [self.clean(t) for t in texts]


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """Greedy for ``temperature`` 0, else sampling at that temperature."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature}
    return {"do_sample": False}
