"""Datasets: reading Cityscapes and CVAT exports, the synthetic street scenes, preprocessing and data loading.

Nothing is re-exported here, so that importing one module (the class table, say, which serving needs) does not
import the whole data pipeline and its dependencies (albumentations, pandas).
"""
