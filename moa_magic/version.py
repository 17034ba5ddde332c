"""The version, in a leaf module so the front ends can name it without importing the package root."""

__version__ = "0.1.0"
