"""The multi-crop recipe's random choices and photometric ops, one layer each, no import circles:

- `draw`: every random draw of a crop (box, flip, jitter, grayscale, blur, solarise) and the
  parameter row layout that carries them to the device; imports nothing of massl but the config;
- `cpu`: the photometric ops on one uint8 crop in a DataLoader worker (OpenCV; data.gpu_augment off);
- `device`: the same ops batched on the training device (data.gpu_augment on).

`massl.data.multicrop` (decode, crop, resize) uses all three. Nothing is imported here, so that
OpenCV is loaded only where the CPU ops run.
"""
