"""Example processing modules that ship with dts (the default stream runs one)."""
