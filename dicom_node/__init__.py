"""dicom_node: a DICOM network node that analyses received studies and sends back SEG + SR."""

__version__ = "0.1.0"
