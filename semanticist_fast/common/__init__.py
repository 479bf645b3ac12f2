"""The ground floor: file writes, the run-directory layout, devices and seeds. Imports nothing of the package."""
