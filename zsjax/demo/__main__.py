import sys

from zsjax.demo.run import main

sys.exit(main())
