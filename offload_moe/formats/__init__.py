"""Expert formats: how one expert lies in one contiguous buffer (`base`), the quantized ones (`group`, `int8`,
`int4`, `mxfp4`), their kernels, choosing one (`registry`), int8 attention and head, and their bytes."""
