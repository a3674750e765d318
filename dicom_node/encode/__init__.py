"""Analysis results -> DICOM objects (highdicom SEG and TID 1500 SR)."""
