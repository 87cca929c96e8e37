"""How a sample's ``<image>`` tags and its images must agree, and which images its text holds.

A record lists its images in the order of their tags (:mod:`lvlm_tune.data.record`), and tags
may sit in any user turn, several per turn. The rule the encoder follows (``docs/images.md``):

* with tags, there is one tag per image, else the sample is refused (``image_tag_mismatch``);
  without any tag all images belong to the first user turn (``image_position: keep``, which
  leaves images where their tags are, needs the tags);
* ``image_position`` ``before`` / ``after`` / ``random`` moves only the first user turn's images
  (:func:`lvlm_tune.templates.render.place_images`); later tags stay where the data put them;
* a template that trains only the first question/answer pair (``plain`` with
  ``plain_multi_turn: first``) drops the images whose tags were in the turns it drops, as
  truncation drops the images of the turns it cuts; the kept images are always the first ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from lvlm_tune.data.errors import BadSampleError
from lvlm_tune.data.image_tokens import ImageSize
from lvlm_tune.data.record import IMAGE_TAG, Conversation, Turn


def count_tags(turns: Sequence[Turn]) -> int:
    """``<image>`` tags in the turns' text."""
    return sum(t.content.count(IMAGE_TAG) for t in turns)


def text_image_count(
    record: Conversation, turns: Sequence[Turn], kept: Sequence[Turn], position: str
) -> int:
    """How many of the record's images (its first ones) the ``kept`` turns hold.

    Args:
        record: the sample (its images, and for errors).
        turns: all its turns, before a template keeps only some.
        kept: the turns that will be rendered (a prefix of ``turns``).
        position: the ``image_position``.

    Raises:
        BadSampleError: the tags do not match the images one to one, or ``keep`` has no tags.
    """
    tags, num_images = count_tags(turns), len(record.images)
    if (tags and tags != num_images) or (position == "keep" and tags != num_images):
        raise BadSampleError.of(
            record, "image", f"{tags} {IMAGE_TAG} tag(s) in the text but {num_images} image(s)"
            + (" (image_position 'keep' needs one tag per image)" if not tags else ""),
            "image_tag_mismatch",
        )  # fmt: skip
    return count_tags(kept) if tags else num_images


def checked_sizes(
    record: Conversation, sizes: Sequence[ImageSize] | None, needed: bool
) -> list[ImageSize]:
    """``sizes`` (one ``(height, width)`` per image of ``record``) checked; placeholders when
    the image token counts do not depend on sizes (``needed`` false) and none were given."""
    if sizes is None:
        if needed and record.images:
            raise ValueError(
                f"sample {record.id!r}: this model's image tokens depend on the image sizes; "
                "pass image_sizes (ImageLoader.sizes) to encode the sample"
            )
        return [(0, 0)] * len(record.images)
    if len(sizes) != len(record.images):
        raise ValueError(
            f"sample {record.id!r}: {len(sizes)} image size(s) for {len(record.images)} image(s)"
        )
    return list(sizes)
