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

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torchio.data.io import nib_to_sitk
from torchio.transforms.augmentation.spatial.random_elastic_deformation import ElasticDeformation


class FieldElasticDeformation(ElasticDeformation):
    """`tio.ElasticDeformation` given its control points, every image resampled through one displacement field."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if not any(self.max_displacement):
            return subject
        subject.check_consistent_spatial_shape()
        transform: sitk.Transform | None = None
        for image in self.get_images(subject):
            scalar = isinstance(image, tio.ScalarImage)
            interpolator = self.get_sitk_interpolator(self.image_interpolation if scalar else self.label_interpolation)
            channels = []
            for component in image.data:
                reference = nib_to_sitk(component[np.newaxis], image.affine, force_3d=True)
                if transform is None:  # every image of a subject shares its grid (checked above)
                    transform = self._field(reference)
                resampler = sitk.ResampleImageFilter()
                resampler.SetReferenceImage(reference)
                resampler.SetTransform(transform)
                resampler.SetInterpolator(interpolator)
                resampler.SetDefaultPixelValue(component.min().item())  # as TorchIO: the image's minimum outside
                resampler.SetOutputPixelType(sitk.sitkFloat32)
                resampled, _ = self.sitk_to_nib(resampler.Execute(reference))
                channels.append(torch.as_tensor(resampled))
            image.set_data(torch.cat(channels))
        return subject

    def _field(self, reference: sitk.Image) -> sitk.DisplacementFieldTransform:
        """TorchIO's B-spline transform on `reference`'s grid, evaluated once at every voxel."""
        bspline = self.get_bspline_transform(reference)
        self.parse_free_form_transform(bspline, self.max_displacement)  # TorchIO's folding warning
        field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, reference.GetSize(),
                                                  reference.GetOrigin(), reference.GetSpacing(),
                                                  reference.GetDirection())
        return sitk.DisplacementFieldTransform(field)


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
