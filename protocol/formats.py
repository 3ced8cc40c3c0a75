"""The stream formats `verify-stream` knows, outermost first: an xl save
file wraps a libxl stream, which wraps a libxc one.  Apart from the checker
so that the command line can offer them without loading it."""

FORMATS = ("xl", "libxl", "libxc")
