"""Cut per-cell crops from a labelled field and paste per-cell maps back.

Crops are cut exactly as the model's training crops were, following the
model's :class:`~napari_supn.preprocessing.Preprocessing`:

- ``crop_mode="centred"``: the crop is centred on the cell's centroid. When
  ``cell_diameter`` is set, the field is rescaled so that the cell's
  equivalent diameter (2·sqrt(area/π)) becomes ``cell_diameter`` crop
  pixels. Otherwise the crop is at native scale.
- ``crop_mode="bbox_resize"``: the cell's bounding box is resized to
  ``crop_size``×``crop_size`` without keeping the aspect ratio, as in the
  NIH malaria crops.

Each crop has an affine transform from crop to field pixel coordinates,
``(row, col, 1)`` column vectors with pixel centres at integer coordinates,
so maps computed on a crop (or on the pooled model input) can be pasted back
into the field.

Crop pixels that fall outside the field are filled by mirror reflection of
the field (``scipy.ndimage`` mode ``"mirror"``); they never count as part of
the cell mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger("napari_supn")

DEFAULT_BATCH_SIZE = 256
Reduce = Literal["max", "mean", "sum"]


@dataclass
class CellCrops:
    """Crops of n cells from one field, with what is needed to map them back.

    Attributes
    ----------
    images : np.ndarray, shape (n, crop, crop) or (n, crop, crop, 3), float32
        Raw intensities of the field (no scaling or blur). With
        ``mask_background`` set, pixels outside the cell hold the raw value
        that the preprocessing maps to its ``background_value``.
    masks : np.ndarray, shape (n, crop, crop), bool
        The cell's own pixels (neighbouring cells excluded).
    labels : np.ndarray, shape (n,), int32
        Label id of each cell in the field's label image.
    transforms : np.ndarray, shape (n, 3, 3), float64
        Affine map from crop (row, col, 1) to field (row, col, 1).
    bboxes : np.ndarray, shape (n, 4), int64
        Bounding box in the field: min_row, min_col, max_row, max_col
        (max exclusive).
    touches_border : np.ndarray, shape (n,), bool
        True when the cell's bounding box reaches the field edge, so part of
        the cell may be cut off.
    centroid_y, centroid_x : np.ndarray, shape (n,), float64
        Cell centroid in field pixels.
    area : np.ndarray, shape (n,), int64
        Cell area in field pixels.
    pixels : list of np.ndarray, each shape (area_i, 2), int32
        Field (row, col) of every pixel of each cell, used to paste maps back.
    crop_size : int
        Side of the square crops.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    transforms: np.ndarray
    bboxes: np.ndarray
    touches_border: np.ndarray
    centroid_y: np.ndarray
    centroid_x: np.ndarray
    area: np.ndarray
    pixels: list
    crop_size: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def label_ids(self) -> np.ndarray:
        """Alias of ``labels``: the label id of each cell, (n,)."""
        return self.labels


# ---------------------------------------------------------------------------
# Validation


def _validate_field(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(
            f"image shape {image.shape} is not (height, width) or (height, width, 3): "
            "pass one grey plane or an RGB image with channels last"
        )
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image dtype {image.dtype} is not supported: pass integer or float intensities")
    if labels.shape != image.shape[:2]:
        raise ValueError(
            f"labels shape {labels.shape} does not match the image's height and width "
            f"{image.shape[:2]}: pass the label image segmented from this image"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels dtype {labels.dtype} is not an integer type: pass a label image "
                         "(0 background, 1..n cells), e.g. labels.astype(np.int32)")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels contain negative ids (minimum {labels.min()}): use 0 for background")
    return image, labels


def _cell_ids(labels: np.ndarray, labels_subset: Optional[Sequence[int]]) -> np.ndarray:
    present = np.unique(labels)
    present = present[present != 0]
    if labels_subset is None:
        return present.astype(np.int64)

    requested = np.unique(np.asarray(labels_subset, dtype=np.int64))
    missing = np.setdiff1d(requested, present)
    if missing.size:
        raise ValueError(
            f"labels_subset requests label ids {missing[:10].tolist()} that are not in the label "
            "image: pass ids of existing cells"
        )
    return requested


# ---------------------------------------------------------------------------
# Geometry


def crop_transform(preprocessing, bbox: tuple[int, int, int, int],
                   centroid: tuple[float, float], area: int) -> np.ndarray:
    """Return the 3×3 affine map from crop (row, col, 1) to field (row, col, 1).

    Parameters
    ----------
    preprocessing : Preprocessing
        Uses ``crop_size``, ``crop_mode`` and ``cell_diameter``.
    bbox : (min_row, min_col, max_row, max_col), max exclusive
    centroid : (row, col) in field pixels
    area : cell area in field pixels
    """
    size = preprocessing.crop_size
    if preprocessing.crop_mode == "bbox_resize":
        min_row, min_col, max_row, max_col = bbox
        step_row = (max_row - min_row) / size
        step_col = (max_col - min_col) / size
        # Crop pixel i covers field rows [min_row + i·step, min_row + (i+1)·step).
        offset_row = min_row - 0.5 + 0.5 * step_row
        offset_col = min_col - 0.5 + 0.5 * step_col
    elif preprocessing.crop_mode == "centred":
        scale = 1.0
        if preprocessing.cell_diameter:
            equivalent_diameter = 2.0 * np.sqrt(area / np.pi)
            scale = preprocessing.cell_diameter / equivalent_diameter
        step_row = step_col = 1.0 / scale
        centre = (size - 1) / 2
        offset_row = centroid[0] - centre * step_row
        offset_col = centroid[1] - centre * step_col
    else:
        raise ValueError(f"crop_mode {preprocessing.crop_mode!r} is not 'centred' or 'bbox_resize'")

    return np.array([[step_row, 0.0, offset_row],
                     [0.0, step_col, offset_col],
                     [0.0, 0.0, 1.0]])


def _sample_crop(image: np.ndarray, labels: np.ndarray, cell_id: int,
                 transform: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample one crop and its mask from the field through ``transform``."""
    index = np.arange(size, dtype=np.float64)
    rows = transform[0, 0] * index + transform[0, 2]
    cols = transform[1, 1] * index + transform[1, 2]

    # Work on the field window under the crop (2 px margin for interpolation).
    height, width = labels.shape
    top = int(np.clip(np.floor(rows.min()) - 2, 0, height - 1))
    bottom = int(np.clip(np.ceil(rows.max()) + 3, top + 1, height))
    left = int(np.clip(np.floor(cols.min()) - 2, 0, width - 1))
    right = int(np.clip(np.ceil(cols.max()) + 3, left + 1, width))
    grid_rows, grid_cols = np.meshgrid(rows - top, cols - left, indexing="ij")
    coordinates = np.stack([grid_rows, grid_cols])

    # Anti-alias before shrinking, as skimage.transform.resize does.
    sigma = (max(0.0, (transform[0, 0] - 1) / 2), max(0.0, (transform[1, 1] - 1) / 2))
    window = image[top:bottom, left:right].astype(np.float32)
    planes = [window] if window.ndim == 2 else [window[..., c] for c in range(window.shape[-1])]
    sampled = []
    for plane in planes:
        if max(sigma) > 0:
            plane = ndi.gaussian_filter(plane, sigma, mode="mirror")
        sampled.append(ndi.map_coordinates(plane, coordinates, order=1, mode="mirror"))
    crop = sampled[0] if window.ndim == 2 else np.stack(sampled, axis=-1)

    # Nearest-neighbour labels; pixels outside the field are never the cell.
    window_labels = (labels[top:bottom, left:right] == cell_id).astype(np.uint8)
    mask = ndi.map_coordinates(window_labels, coordinates, order=0, mode="constant", cval=0) > 0
    return crop.astype(np.float32), mask


def _raw_background(preprocessing) -> float:
    """Raw intensity that the preprocessing's intensity mapping sends to ``background_value``."""
    low = float(getattr(preprocessing, "intensity_low", 0.0))
    high = float(getattr(preprocessing, "intensity_high", 1.0))
    value = float(getattr(preprocessing, "background_value", -1.0))
    return low + (value + 1.0) / 2.0 * (high - low)


# ---------------------------------------------------------------------------
# Extraction


def _empty_crops(size: int, rgb: bool) -> CellCrops:
    shape = (0, size, size, 3) if rgb else (0, size, size)
    return CellCrops(
        images=np.zeros(shape, np.float32),
        masks=np.zeros((0, size, size), bool),
        labels=np.zeros(0, np.int32),
        transforms=np.zeros((0, 3, 3)),
        bboxes=np.zeros((0, 4), np.int64),
        touches_border=np.zeros(0, bool),
        centroid_y=np.zeros(0),
        centroid_x=np.zeros(0),
        area=np.zeros(0, np.int64),
        pixels=[],
        crop_size=size,
    )


def _cut_batch(image: np.ndarray, labels: np.ndarray, preprocessing,
               cell_ids: np.ndarray, objects: list) -> CellCrops:
    size = preprocessing.crop_size
    rgb = image.ndim == 3
    count = len(cell_ids)
    if count == 0:
        return _empty_crops(size, rgb)

    crops = _empty_crops(size, rgb)
    images = np.empty((count,) + crops.images.shape[1:], np.float32)
    masks = np.empty((count, size, size), bool)
    transforms = np.empty((count, 3, 3))
    bboxes = np.empty((count, 4), np.int64)
    centroid_y = np.empty(count)
    centroid_x = np.empty(count)
    area = np.empty(count, np.int64)
    pixels = []
    background = _raw_background(preprocessing) if preprocessing.mask_background else None
    height, width = labels.shape

    for index, cell_id in enumerate(cell_ids):
        row_slice, col_slice = objects[cell_id - 1]
        local_rows, local_cols = np.nonzero(labels[row_slice, col_slice] == cell_id)
        rows = local_rows + row_slice.start
        cols = local_cols + col_slice.start

        bboxes[index] = (row_slice.start, col_slice.start, row_slice.stop, col_slice.stop)
        area[index] = rows.size
        centroid_y[index] = rows.mean()
        centroid_x[index] = cols.mean()
        pixels.append(np.stack([rows, cols], axis=1).astype(np.int32))

        transforms[index] = crop_transform(
            preprocessing, tuple(bboxes[index]), (centroid_y[index], centroid_x[index]), rows.size)
        images[index], masks[index] = _sample_crop(image, labels, cell_id, transforms[index], size)
        if background is not None:
            images[index][~masks[index]] = background

    touches_border = ((bboxes[:, 0] == 0) | (bboxes[:, 1] == 0)
                      | (bboxes[:, 2] == height) | (bboxes[:, 3] == width))
    return CellCrops(images, masks, cell_ids.astype(np.int32), transforms, bboxes,
                     touches_border, centroid_y, centroid_x, area, pixels, size)


def iter_cell_batches(
    image: np.ndarray,
    labels: np.ndarray,
    preprocessing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    labels_subset: Optional[Sequence[int]] = None,
) -> Iterator[CellCrops]:
    """Yield the crops of a field's cells, ``batch_size`` cells at a time.

    Memory per batch is about ``batch_size · crop_size² · (4·channels + 1)``
    bytes (crops plus masks; 256 RGB crops of 128 px: 52 MB), plus 8 bytes
    per cell pixel for the paste-back coordinates, whatever the number of
    cells in the field.

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3)
        Field of view, any integer or float dtype (raw intensities).
    labels : np.ndarray, shape (height, width), integer
        0 for background, one id per cell.
    preprocessing : Preprocessing
        The model's settings (``crop_size``, ``crop_mode``,
        ``cell_diameter``, ``mask_background``, ``background_value``,
        ``intensity_low``, ``intensity_high``).
    batch_size : int
        Cells per yielded batch.
    labels_subset : sequence of int, optional
        Only these label ids, in increasing order; all cells when None.

    Yields
    ------
    CellCrops
        Cells in increasing label order. Nothing is yielded when the field
        has no cells.
    """
    image, labels = _validate_field(image, labels)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    cell_ids = _cell_ids(labels, labels_subset)
    if cell_ids.size == 0:
        return
    objects = ndi.find_objects(labels, max_label=int(cell_ids.max()))
    logger.debug("Cutting %d cells in batches of %d (crop_mode %s)",
                 cell_ids.size, batch_size, preprocessing.crop_mode)
    for start in range(0, cell_ids.size, batch_size):
        yield _cut_batch(image, labels, preprocessing, cell_ids[start:start + batch_size], objects)


def extract_cells(
    image: np.ndarray,
    labels: np.ndarray,
    preprocessing,
    *,
    labels_subset: Optional[Sequence[int]] = None,
) -> CellCrops:
    """Cut one crop per cell, all at once (see :func:`iter_cell_batches` for large fields).

    Parameters and crop layout are those of :func:`iter_cell_batches`.
    Returns an empty :class:`CellCrops` (n = 0) when the field has no cells.
    """
    image, labels = _validate_field(image, labels)
    cell_ids = _cell_ids(labels, labels_subset)
    if cell_ids.size == 0:
        return _empty_crops(preprocessing.crop_size, image.ndim == 3)
    objects = ndi.find_objects(labels, max_label=int(cell_ids.max()))
    return _cut_batch(image, labels, preprocessing, cell_ids, objects)


# ---------------------------------------------------------------------------
# Paste-back


def _as_numpy_maps(crop_maps) -> np.ndarray:
    if hasattr(crop_maps, "detach"):
        crop_maps = crop_maps.detach().cpu().numpy()
    maps = np.asarray(crop_maps, dtype=np.float32)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(
            f"crop_maps shape {maps.shape} is not (n, size, size) or (n, 1, size, size): "
            "pass one square map per cell"
        )
    return maps


def paste_to_field(crop_maps, cells: CellCrops, field_shape: tuple[int, int], *,
                   reduce: Reduce = "max") -> np.ndarray:
    """Map per-cell maps back into field coordinates, each inside its own cell.

    Every field pixel of a cell takes the value of its cell's map at the
    corresponding crop position (bilinear interpolation), so neighbouring
    cells never overwrite each other. Maps may be at crop resolution or
    pooled (model resolution): the scale is ``crop_size / map_size``, and a
    map pixel is taken to cover that many crop pixels.

    Parameters
    ----------
    crop_maps : array or torch.Tensor, shape (n, size, size) or (n, 1, size, size)
        One map per cell of ``cells``, in the same order.
    cells : CellCrops
        The crops the maps were computed from.
    field_shape : (height, width)
        Shape of the field the cells were cut from.
    reduce : {"max", "mean", "sum"}
        How to combine maps when the same field pixel belongs to several
        entries of ``cells`` (a label repeated); irrelevant otherwise.

    Returns
    -------
    np.ndarray, shape (height, width), float32
        0 outside the pasted cells. Batches of distinct cells paste to
        disjoint pixels, so their results can be combined with
        ``np.maximum`` or ``+``.
    """
    maps = _as_numpy_maps(crop_maps)
    if maps.shape[0] != len(cells):
        raise ValueError(f"crop_maps has {maps.shape[0]} maps but cells has {len(cells)} cells: "
                         "pass one map per cell, in the same order")
    if reduce not in ("max", "mean", "sum"):
        raise ValueError(f"reduce {reduce!r} is not one of 'max', 'mean', 'sum'")
    height, width = (int(side) for side in field_shape)

    field = np.zeros((height, width), np.float32)
    if reduce == "max":
        field[:] = -np.inf
    counts = np.zeros((height, width), np.int32)
    scale = cells.crop_size / maps.shape[-1]

    for index in range(len(cells)):
        pixels = cells.pixels[index]
        if pixels.size and (pixels.max(axis=0) >= (height, width)).any():
            raise ValueError(f"cell {cells.labels[index]} lies outside field_shape {field_shape}: "
                             "pass the shape of the field the cells were cut from")
        inverse = np.linalg.inv(cells.transforms[index])
        crop_rows = inverse[0, 0] * pixels[:, 0] + inverse[0, 2]
        crop_cols = inverse[1, 1] * pixels[:, 1] + inverse[1, 2]
        # Crop pixel centre c lies at map coordinate (c + 0.5) / scale − 0.5.
        coordinates = np.stack([(crop_rows + 0.5) / scale - 0.5, (crop_cols + 0.5) / scale - 0.5])
        values = ndi.map_coordinates(maps[index], coordinates, order=1, mode="nearest")

        rows, cols = pixels[:, 0], pixels[:, 1]
        if reduce == "max":
            field[rows, cols] = np.maximum(field[rows, cols], values)
        else:
            field[rows, cols] += values
        counts[rows, cols] += 1

    if reduce == "max":
        field[counts == 0] = 0.0
    elif reduce == "mean":
        np.divide(field, counts, out=field, where=counts > 0)
    return field
