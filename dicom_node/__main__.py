"""``python -m dicom_node`` -> :func:`dicom_node.cli.main`."""

from dicom_node.cli import main

raise SystemExit(main())
