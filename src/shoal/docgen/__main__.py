import sys

from shoal.docgen import main

sys.exit(main())
