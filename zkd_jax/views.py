"""The image views a method trains on, and where a batch holds each: the one home of that fact.

A *view* is one augmentation of the same training images. Every method uses the ``"weak"`` view
(crop + flip); MLKD also uses ``"strong"`` (crop + flip + RandAugment + Cutout). Methods declare
their views (``Method.views``), the data pipelines build the batch entries named here, the feeds
check that they can serve them, and the train step reads each view from its entry.

How the views' images are made is the run's *augmentation* (:data:`AUGMENTATIONS`): the CNN
recipes' ``"cifar"`` (pad-crop + flip, Cutout/RandAugment for the strong view; the images keep the
dataset's size) or the ViT students' ``"vit"`` (RandomResizedCrop to the
students' size, flip, RandAugment, RandomErasing; test images resized; the weak view only).
"""

from __future__ import annotations

from collections.abc import Sequence

WEAK = "weak"
STRONG = "strong"

#: The batch entry holding each view's images.
BATCH_KEYS: dict[str, str] = {WEAK: "image", STRONG: "image_strong"}

#: The view sets a method may ask for, in the order the student sees them.
VIEW_SETS: tuple[tuple[str, ...], ...] = ((WEAK,), (WEAK, STRONG))

CIFAR_AUGMENTATION = "cifar"
VIT_AUGMENTATION = "vit"
#: The augmentations a pipeline may apply (see the module docstring).
AUGMENTATIONS: tuple[str, ...] = (CIFAR_AUGMENTATION, VIT_AUGMENTATION)


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """``views`` as a tuple; raises ``ValueError`` unless it is one of :data:`VIEW_SETS`."""
    views = tuple(views)
    if views not in VIEW_SETS:
        raise ValueError(f"views must be one of {VIEW_SETS}, got {views}.")
    return views


def check_augmentation(augmentation: str, views: Sequence[str]) -> str:
    """``augmentation`` checked against :data:`AUGMENTATIONS` and ``views`` (``"vit"`` makes the
    weak view only); raises one ``ValueError`` otherwise."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation {augmentation!r} is unknown; use one of "
                         f"{', '.join(AUGMENTATIONS)}.")
    if augmentation == VIT_AUGMENTATION and tuple(views) != (WEAK,):
        raise ValueError("the ViT augmentation makes the weak view only; use a method that "
                         "trains on the weak view (not MLKD) with the ViT recipe.")
    return augmentation


def images_of(batch, views: Sequence[str]) -> dict:
    """``{view: batch[BATCH_KEYS[view]]}`` for each of ``views``."""
    return {view: batch[BATCH_KEYS[view]] for view in views}


def teacher_input(images, size: int = 32):
    """The teacher's view of the students' batch: ``F.interpolate(x, size, bilinear,
    align_corners=False)`` without antialiasing.

    ``images [B, H, H, C]`` with ``H = f * size``. Output pixel ``i`` samples input coordinate
    ``f i + (f - 1) / 2``: for odd ``f`` (224 / 32 = 7) that is exactly pixel ``(7 i + 3, 7 j + 3)``
    (a strided slice, no arithmetic); for even ``f`` the mean of the two middle pixels per axis.
    """
    h, w = images.shape[1:3]
    if h != w or h % size:
        raise ValueError(
            f"teacher_input needs square images whose side is a multiple of {size} (got {h}x{w}); "
            "feed the students 224-px images (7 x 32)."
        )
    f = h // size
    if f % 2:
        c = (f - 1) // 2
        return images[:, c::f, c::f]
    lo = f // 2 - 1
    a = images[:, lo::f] + images[:, lo + 1::f]
    return (a[:, :, lo::f] + a[:, :, lo + 1::f]) / 4
