"""Read image files and folders of cell crops.

Two crop-folder layouts are supported:

- flat: ``folder/*.png`` (or TIFF, JPEG), crops only, no masks;
- paired: ``folder/raw/NAME`` with the crop and ``folder/mask/NAME`` with
  its cell mask (nonzero is cell, e.g. 0/254 PNGs), the same file names in
  both subfolders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("napari_supn")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class CropSet:
    """Crops read from a folder.

    Attributes
    ----------
    images : numpy.ndarray
        (N, H, W) grey or (N, H, W, 3) RGB, in the files' dtype.
    masks : numpy.ndarray or None
        bool (N, H, W) cell masks, or None for a flat folder.
    names : list of str
        File names, in the order of ``images``.
    folder : pathlib.Path
        Folder the crops were read from.
    """

    images: np.ndarray
    masks: np.ndarray | None
    names: list[str]
    folder: Path

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices) -> "CropSet":
        """Return the crops at ``indices`` (a sequence of ints) as a new CropSet."""
        indices = np.asarray(indices, dtype=int)
        return CropSet(
            images=self.images[indices],
            masks=None if self.masks is None else self.masks[indices],
            names=[self.names[i] for i in indices],
            folder=self.folder,
        )


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as (H, W) grey or (H, W, 3) RGB, keeping its dtype.

    An alpha channel is dropped; grey+alpha becomes grey. TIFF files go
    through tifffile, other formats through scikit-image (imageio).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file cannot be decoded or is not a 2D grey or RGB image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        else:
            from skimage import io

            image = io.imread(path)
    except Exception as error:  # decoders raise many unrelated types on bad files
        raise ValueError(f"cannot read image {path}: {error}") from error

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[-1] == 2:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(
            f"image {path} has shape {image.shape}; expected a 2D grey (H, W) or RGB "
            "(H, W, 3) image"
        )
    return image


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Return the image files of ``folder`` sorted by name, and the count of other files."""
    images, skipped = [], 0
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            images.append(path)
        elif path.is_file():
            skipped += 1
    return images, skipped


def _stack(arrays: list[np.ndarray], paths: list[Path], what: str) -> np.ndarray:
    """Stack same-shaped, same-dtype arrays; raise ValueError naming the first odd file."""
    first_shape, first_dtype = arrays[0].shape, arrays[0].dtype
    for array, path in zip(arrays, paths):
        if array.shape != first_shape:
            raise ValueError(
                f"{what} {path} has shape {array.shape} but {paths[0].name} has {first_shape}; "
                "all crops in a folder must have the same size and channels"
            )
        if array.dtype != first_dtype:
            raise ValueError(
                f"{what} {path} has dtype {array.dtype} but {paths[0].name} has {first_dtype}; "
                "convert the crops to one dtype"
            )
    return np.stack(arrays)


def load_crops(folder: str | Path, *, use_masks: bool = True, limit: int | None = None) -> CropSet:
    """Read a folder of crops, flat or ``raw/`` + ``mask/``.

    Parameters
    ----------
    folder : str or Path
        The crop folder.
    use_masks : bool
        Read ``mask/`` when the folder has the paired layout. With False the
        masks are not read and ``CropSet.masks`` is None.
    limit : int or None
        Read only the first ``limit`` crops in name order.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist.
    ValueError
        If it contains no images, a crop has no mask (or a mask no crop), or
        crops differ in size, channels or dtype; the message names the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"crop folder not found: {folder}")

    raw_folder, mask_folder = folder / "raw", folder / "mask"
    paired = raw_folder.is_dir()
    image_paths, skipped = _image_files(raw_folder if paired else folder)
    if skipped:
        logger.info("Skipped %d non-image files in %s", skipped, raw_folder if paired else folder)
    if not image_paths:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in {folder}; expected crops "
            "directly in the folder or in raw/ and mask/ subfolders"
        )
    if limit is not None:
        image_paths = image_paths[:limit]

    mask_paths = None
    if paired and use_masks:
        if not mask_folder.is_dir():
            raise ValueError(f"{folder} has raw/ but no mask/ subfolder; add masks or use a flat folder")
        mask_files, _ = _image_files(mask_folder)
        mask_by_name = {path.name: path for path in mask_files}
        missing = [path.name for path in image_paths if path.name not in mask_by_name]
        if missing:
            raise ValueError(
                f"crop {raw_folder / missing[0]} has no mask {mask_folder / missing[0]} "
                f"({len(missing)} crops without masks)"
            )
        if limit is None:
            raw_names = {path.name for path in image_paths}
            extra = sorted(name for name in mask_by_name if name not in raw_names)
            if extra:
                raise ValueError(
                    f"mask {mask_folder / extra[0]} has no crop {raw_folder / extra[0]} "
                    f"({len(extra)} masks without crops)"
                )
        mask_paths = [mask_by_name[path.name] for path in image_paths]

    images = _stack([read_image(path) for path in image_paths], image_paths, "crop")
    masks = None
    if mask_paths is not None:
        mask_arrays = [read_image(path) for path in mask_paths]
        for array, path in zip(mask_arrays, mask_paths):
            if array.ndim != 2:
                raise ValueError(f"mask {path} has shape {array.shape}; masks must be 2D grey images")
        masks = _stack(mask_arrays, mask_paths, "mask") > 0
        if masks.shape != images.shape[:3]:
            raise ValueError(
                f"masks in {mask_folder} are {masks.shape[1:]} but crops are {images.shape[1:3]}"
            )

    logger.info(
        "Read %d crops %s from %s%s",
        len(image_paths),
        "×".join(str(s) for s in images.shape[1:]),
        folder,
        " with masks" if masks is not None else "",
    )
    return CropSet(images=images, masks=masks, names=[p.name for p in image_paths], folder=folder)
