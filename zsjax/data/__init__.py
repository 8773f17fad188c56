"""Data readers and example builders."""
