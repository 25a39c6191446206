"""The image input path of the shared policy, for Qwen2.5-VL-style models.

The planner sees the episode's first frame and the executor the current frame of
its segment (paper §4.1, visual Sokoban). A frame reaches the model as
- one `{"type": "image"}` part in the last user message, which the chat template
  writes as `<|vision_start|><|image_pad|><|vision_end|>`;
- that single `<|image_pad|>` repeated `prod(grid_thw) // merge_size**2` times (one
  placeholder per merged visual token);
- `pixel_values` (patches, 3 * temporal_patch * patch**2) and `image_grid_thw`
  (images, 3) from `Qwen2VLImageProcessor(Pil)`, used directly: the processor class
  (`Qwen2_5_VLProcessor`) needs torchvision, which CPU installs here lack.
Batches concatenate the rows' patches in row order, which is the order the model
matches them to the placeholders, so rows with and without images can share a batch.

A 6x6 Sokoban frame is 96x96 (16-px tiles); the processor resizes it to 84x84, a
multiple of 28: one 14-px ViT patch per cell and 2x2 cells per language-model
token, i.e. 9 image tokens per frame.

The tiny test model for this path (`tiny-vl`) is built in himac/tiny.py.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"


@dataclass
class Pixels:
    """The processed images of one prompt (its row carries them into the update)."""
    pixel_values: torch.Tensor  # (patches, 3 * temporal_patch * patch**2), float32 on the CPU
    grid_thw: torch.Tensor  # (images, 3) long: patches along time, height, width

    def tokens(self, merge_size: int) -> list[int]:
        """Placeholder tokens each image takes in the text."""
        return [int(n) // merge_size ** 2 for n in self.grid_thw.prod(-1)]


def is_vision_model(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def placeholder_ids(model) -> list[int]:
    """The ids a vision-language model reads as image/video markers (`image_token_id`, `video_token_id`,
    `vision_start_token_id`, `vision_end_token_id`); [] for a text model.

    The policy never samples them: a completion holding one `<|image_pad|>` makes the update's forward
    count more image tokens than image features and stop ("Image features and image tokens do not
    match"). A random-weight shape model samples each with probability ~1/152k a token, so a 64 x
    512-token blueprint batch holds 0.86 marker tokens on average (four marker ids)."""
    if not is_vision_model(model):
        return []
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({i for i in (getattr(model.config, n, None) for n in names) if i is not None})


def load_image_processor(path: str):
    """The slow (PIL) Qwen2-VL image processor: it needs no torchvision."""
    try:
        from transformers import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # transformers < 5.x names the PIL one Qwen2VLImageProcessor
        from transformers import Qwen2VLImageProcessor as Processor
    return Processor.from_pretrained(path)


def with_images(messages: list[dict], n_images: int) -> list[dict]:
    """A copy of `messages` whose last user turn opens with `n_images` image parts."""
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("images need a user message to attach to; the messages have none")
    text = out[last]["content"]
    if not isinstance(text, str):
        raise ValueError(f"expected the user message's content to be text, got {type(text).__name__}")
    out[last]["content"] = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return out


def process(processor, images: list[np.ndarray]) -> Pixels:
    """(H, W, 3) uint8 frames -> Pixels."""
    for i, im in enumerate(images):
        if not (isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8):
            raise ValueError(f"image {i} must be an (H, W, 3) uint8 array, got "
                             f"{getattr(im, 'shape', type(im).__name__)} {getattr(im, 'dtype', '')}")
    out = processor(images=list(images), return_tensors="pt")
    return Pixels(out["pixel_values"].float(), out["image_grid_thw"].long())


def expand_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """Repeat the i-th `pad_id` in `ids` counts[i] times (one per merged visual token)."""
    found = [i for i, t in enumerate(ids) if t == pad_id]
    if len(found) != len(counts):
        raise ValueError(f"the prompt holds {len(found)} image placeholders but {len(counts)} images were given")
    out, start = [], 0
    for pos, n in zip(found, counts):
        out += ids[start:pos] + [pad_id] * n
        start = pos + 1
    return out + ids[start:]


def collate(pixels: list[Pixels | None]) -> dict[str, torch.Tensor]:
    """Model kwargs for a batch whose rows carry `pixels` (None: a text-only row); {} if no row has images."""
    present = [p for p in pixels if p is not None]
    if not present:
        return {}
    return {"pixel_values": torch.cat([p.pixel_values for p in present]),  # (sum patches, D)
            "image_grid_thw": torch.cat([p.grid_thw for p in present])}  # (sum images, 3)


# -- glue for planner / executor / update ---------------------------------------------
def frames(obs) -> list[np.ndarray]:
    """The images an observation shows the policy: [obs.image], or [] for a text observation."""
    return [] if obs.image is None else [obs.image]


def state_key(obs) -> str:
    """A string that tells observations apart (GiGPO's anchor state): the text, plus a digest of the
    frame when there is one, since with `observation: image` every text is the same placeholder."""
    if obs.image is None:
        return obs.text
    return obs.text + "\n#frame " + hashlib.sha1(np.ascontiguousarray(obs.image).tobytes()).hexdigest()


def image_kwargs(pixels: list[Pixels | None]) -> dict:
    """{"images": pixels} for Policy.generate / logprobs, or {} when no row has images (the text path)."""
    return {"images": list(pixels)} if any(p is not None for p in pixels) else {}


def processor_chat_template(path: str) -> str | None:
    """The chat template a VL repo keeps for its processor (chat_template.json), for a tokenizer
    that ships without one; None if there is none. `path` is a local directory or a hub name."""
    local = Path(path)
    if local.is_dir():
        file = local / "chat_template.json"
        if not file.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download
            file = Path(hf_hub_download(path, "chat_template.json"))
        except Exception:  # noqa: BLE001 - no such file (or no hub): the caller reports the missing template
            return None
    return json.loads(file.read_text()).get("chat_template")
