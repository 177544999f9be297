from rrise.cli import main

main()
