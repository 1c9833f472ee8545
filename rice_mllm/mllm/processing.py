"""RiceMllmProcessor: chat messages + images -> input_ids, labels, attention_mask, pixel tiles, image sizes.

Messages are rendered with the processor's template (ChatML, or LLaVA's plain one for alignment); each `<image>`
placeholder becomes anyres.num_image_tokens(size, tiled) copies of the image token (labelled -100); with `regions`,
each `<region>` placeholder becomes its box text (boxes.fill_regions), so training, eval and the data check render
boxes alike. Invariants: placeholders == images, and a sample is never truncated: too long raises SampleTooLongError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer

from rice_mllm.checkpoint_layout import PROCESSOR_CONFIG_FILE
from rice_mllm.constants import IGNORE_INDEX, IMAGE_TOKEN, REGION_FEATURE_TOKEN
from rice_mllm.mllm.anyres import Size, num_image_tokens
from rice_mllm.mllm.boxes import RegionError, fill_regions, mark_regions
from rice_mllm.mllm.chat_template import DEFAULT_TEMPLATE, get_template, tokenize_chat
from rice_mllm.mllm.image_processing import RiceImageProcessor

CONFIG_NAME = PROCESSOR_CONFIG_FILE


class ImagePlaceholderError(ValueError):
    """The number of `<image>` placeholders differs from the number of images."""


class SampleTooLongError(ValueError):
    """A sample's token count exceeds max_length; cutting it could split an image, so it is refused."""


def count_placeholders(messages: Sequence[Mapping[str, str]]) -> int:
    """Number of IMAGE_TOKEN placeholders in the messages' contents."""
    return sum(str(message.get("content", "")).count(IMAGE_TOKEN) for message in messages)


def add_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Add IMAGE_TOKEN (or another token the model fills with features, e.g. REGION_FEATURE_TOKEN) to the tokenizer
    as a special token if it is missing; return its id.

    The caller resizes the LLM's embeddings when `len(tokenizer)` grew.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(token)


def _single_token_id(tokenizer, token: str) -> int:
    """The id of `token`, which the tokenizer must hold as one special token (see `add_image_token`)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] != tokenizer.convert_tokens_to_ids(token):
        raise ValueError(f"tokenizer splits {token!r} into {ids}: add it as a special token with add_image_token()")
    return ids[0]


class RiceMllmProcessor:
    """Renders one sample for the model.

    Args:
        tokenizer: fast tokenizer holding IMAGE_TOKEN as a special token (see `add_image_token`).
            The processor owns it: its chat_template is set to the template's Jinja twin so saved copies render
            the same text as training.
        image_processor: anyres tiler; its geometry also fixes the image-token count.
        max_length: longest allowed sample in tokens (after image expansion); None for no limit.
        template: "chatml" (default) or "plain" (LLaVA's alignment template), from `chat_template.TEMPLATES`;
            saved with the processor. A later stage sets its own (`data.template`).
        region_tokens: follow each box of a user turn with REGION_FEATURE_TOKEN (which the tokenizer must hold) and
            return the boxes, for a model with region tokens (`region_token_id`); False: boxes are plain text.
    """

    def __init__(
        self,
        tokenizer,
        image_processor: RiceImageProcessor,
        max_length: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        region_tokens: bool = False,
    ) -> None:
        self.image_token_id: int = _single_token_id(tokenizer, IMAGE_TOKEN)
        self.region_token_id = _single_token_id(tokenizer, REGION_FEATURE_TOKEN) if region_tokens else None
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}")
        self.template = template
        self._template = get_template(template)
        self.tokenizer = tokenizer
        self.tokenizer.chat_template = self._template.jinja
        self.image_processor = image_processor
        self.max_length = max_length

    @property
    def region_tokens(self) -> bool:
        return self.region_token_id is not None

    @property
    def pad_token_id(self) -> int:
        """Id used to pad batches: the tokenizer's pad token, else its eos (masked out anyway)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def num_image_tokens(self, image_size: Size, num_images: int = 1) -> int:
        """Image tokens for an image of (height, width) in a sample of `num_images`, from the one count in anyres."""
        geometry = self.image_processor.geometry
        return num_image_tokens(image_size, geometry, geometry.tiles_images_of(num_images))

    def encode(
        self,
        messages: Sequence[Mapping[str, str]],
        image_sizes: Sequence[Size] = (),
        add_generation_prompt: bool = False,
        regions: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token side of a sample, from image sizes alone (the data doctor needs no pixels).

        Does not check max_length (see `check_length`), so a checker can still measure long samples.

        Args:
            regions: pixel boxes (x0, y0, x1, y1) of the `<region>` placeholders, in order, each on the original
                image of the nearest `<image>` before it (boxes.py); None: the text is taken as it is (chat and the
                server send box text itself).

        Returns:
            input_ids, labels, attention_mask: [T] long each.

        Raises:
            ImagePlaceholderError: placeholder count != len(image_sizes).
            RegionError: regions that do not fit the placeholders or the images (boxes.fill_regions).
        """
        placeholders = count_placeholders(messages)
        if placeholders != len(image_sizes):
            raise ImagePlaceholderError(
                f"{placeholders} {IMAGE_TOKEN} placeholder(s) in the messages but {len(image_sizes)} image(s)"
            )
        if regions is not None:
            messages = fill_regions(messages, regions, image_sizes)
        boxes: list = []
        if self.region_token_id is not None:
            messages, boxes, owners = mark_regions(messages, REGION_FEATURE_TOKEN)
        rendered = tokenize_chat(self.tokenizer, self._template.format(messages, add_generation_prompt))
        # The tokenizer holds IMAGE_TOKEN as a special token (checked in __init__): one id per placeholder.
        positions = [i for i, token in enumerate(rendered.input_ids) if token == self.image_token_id]
        input_ids: list[int] = []
        labels: list[int] = []
        start = 0
        for position, size in zip(positions, image_sizes, strict=True):
            input_ids += rendered.input_ids[start:position]
            labels += rendered.labels[start:position]
            count = self.num_image_tokens(tuple(size), len(image_sizes))
            input_ids += [self.image_token_id] * count
            labels += [IGNORE_INDEX] * count
            start = position + 1
        input_ids += rendered.input_ids[start:]
        labels += rendered.labels[start:]
        ids = torch.tensor(input_ids, dtype=torch.long)
        sample = {
            "input_ids": ids,
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.ones_like(ids),
        }
        if self.region_token_id is None:
            return sample
        if int((ids == self.region_token_id).sum()) != len(boxes):  # a region token typed in the text itself
            raise RegionError(
                f"{int((ids == self.region_token_id).sum())} {REGION_FEATURE_TOKEN} tokens for {len(boxes)} boxes: "
                f"the text may not hold {REGION_FEATURE_TOKEN} itself"
            )
        sample["region_boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        sample["region_images"] = torch.tensor(owners, dtype=torch.long)
        return sample

    def check_length(self, num_tokens: int) -> None:
        """Raise SampleTooLongError when num_tokens > max_length (samples are never truncated)."""
        if self.max_length is not None and num_tokens > self.max_length:
            raise SampleTooLongError(
                f"sample has {num_tokens} tokens > max_length {self.max_length}; "
                "it is refused rather than truncated (a cut could split an image)"
            )

    def __call__(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Sequence[Image.Image] = (),
        add_generation_prompt: bool = False,
        regions: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render one sample.

        Args:
            messages: [{"role": "system"|"user"|"assistant", "content": str}], `<image>` marking each image.
            images: PIL images in placeholder order.
            add_generation_prompt: end with an open assistant turn (inference).
            regions: pixel boxes of the `<region>` placeholders (see `encode`); None: text as it is.

        Returns:
            input_ids, labels, attention_mask: [T] long; pixel_values: [tiles, 3, S, S] float32 (tiles = sum of
            anyres.num_tiles over the images, 0 for text-only); image_sizes: [num_images, 2] long (height, width);
            batch_num_images: [1] long.
        """
        sizes = [(image.height, image.width) for image in images]
        sample = self.encode(messages, sizes, add_generation_prompt, regions)
        self.check_length(len(sample["input_ids"]))
        sample.update(self.image_processor(images))
        return sample

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer (with the template's Jinja twin), the image processor config, processor_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        config = {"max_length": self.max_length, "template": self.template, "region_tokens": self.region_tokens}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RiceMllmProcessor:
        """Load what save_pretrained wrote."""
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        config = json.loads(path.read_text())
        unknown = set(config) - {"max_length", "template", "region_tokens"}
        if unknown:
            raise KeyError(f"{path}: unknown keys {sorted(unknown)}")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # Processors saved before templates were a choice rendered ChatML.
        template = config.get("template", DEFAULT_TEMPLATE)
        image_processor = RiceImageProcessor.from_pretrained(directory)
        return cls(tokenizer, image_processor, config["max_length"], template, config.get("region_tokens", False))
