"""Offline batch: encode and score whole data sets with Ray Data (`python -m batch`).

Same model folders and preprocessing as the service (`aecore.runner.Autoencoder`), Parquet
parts out, resumable. Needs the `batch` extra; the service never imports this package.
"""
