"""Labelled data for supervised fine-tuning: readers (pairs, groups, query/positive rows), splits with
no shared text, evaluation sets and their evaluation."""
