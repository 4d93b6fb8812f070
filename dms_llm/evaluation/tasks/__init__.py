"""lm-eval task files (dms_*) that read the original files of a local data folder; see utils.py."""
