"""The Linux provider's serving helper: ``python -I -m virtdisk._serve FD``.

The provider starts this program (fork and exec) for every attachment it
serves through FUSE, with FD its end of the control channel; everything
happens in C (src/provider/helper.h), and it never returns here.
"""

import sys

from ._native import lib

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("virtdisk._serve is started by the virtdisk provider, not by hand")
    lib.vd_serve_main(int(sys.argv[1]))
