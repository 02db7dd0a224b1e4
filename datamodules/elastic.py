"""TorchIO's random elastic deformation with its B-spline evaluated once per subject, not once per image.

`tio.RandomElasticDeformation` resamples every image of a subject through SimpleITK's
`BSplineTransform`, which evaluates the cubic B-spline at every voxel again for each image: the
embedded cohort's lesion subjects carry four images (the T1, the brain mask, the lesion and its
labels), so building the cohort spent most of its time there. `RandomFieldElasticDeformation` draws
the same control points from the same random numbers, evaluates the B-spline once on the images'
grid (`sitk.TransformToDisplacementField`) and resamples every image through that field. At the
grid's own voxels the field holds the B-spline's exact displacements, so every output equals
TorchIO's bit for bit (tests/datamodules/test_elastic.py checks it) at about half the time.
"""

from __future__ import annotations

from typing import Any

import SimpleITK as sitk
import torchio as tio
from torchio.transforms.augmentation.spatial.random_elastic_deformation import ElasticDeformation


class FieldElasticDeformation(ElasticDeformation):
    """`tio.ElasticDeformation` given its control points, whose B-spline TorchIO gets as one displacement field.

    TorchIO's own resampling loop runs unchanged; it asks `get_bspline_transform` for each image's
    transform, and every image on the same grid gets the same field, evaluated once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fields: dict[tuple, sitk.DisplacementFieldTransform] = {}

    def get_bspline_transform(self, image: sitk.Image) -> sitk.Transform:
        grid = (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        if grid not in self._fields:
            bspline = super().get_bspline_transform(image)
            ElasticDeformation.parse_free_form_transform(bspline, self.max_displacement)  # TorchIO's folding warning
            field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, *grid)
            self._fields[grid] = sitk.DisplacementFieldTransform(field)
        return self._fields[grid]

    @staticmethod
    def parse_free_form_transform(transform: sitk.Transform, max_displacement: Any) -> None:
        """Nothing: TorchIO's check reads B-spline coefficients, and it ran on the B-spline above."""


class RandomFieldElasticDeformation(tio.RandomElasticDeformation):
    """`tio.RandomElasticDeformation` (same arguments, same random draws, same output) applied by
    `FieldElasticDeformation`."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        subject.check_consistent_spatial_shape()
        control_points = self.get_params(self.num_control_points, self.max_displacement, self.num_locked_borders)
        transform = FieldElasticDeformation(control_points=control_points, max_displacement=self.max_displacement,
                                            image_interpolation=self.image_interpolation,
                                            label_interpolation=self.label_interpolation, **self._get_base_args())
        return transform(subject)
