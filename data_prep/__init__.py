"""Offline data preparation: importers for common corpus layouts -> validated manifest + reject report.

Run as `voxtral-prep SOURCE_KIND INPUT --out DIR` (see `data_prep.cli`). The trainer only ever reads the
manifest this writes (`voxtral_train.manifest`).
"""
